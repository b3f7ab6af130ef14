from mm_lightning.cli import main

raise SystemExit(main())
