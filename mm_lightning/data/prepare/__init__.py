"""`prepare`: a folder of raw clips and photos -> a training set (metadata.jsonl + media + report).

scan.py (input conventions, shards) -> process.py per file, in parallel (shots.py: PySceneDetect
shots, clip windows, quality; faces.py: the dominant face) -> identities.py (grouping) -> pairs.py
(the paper's cosine rule) -> captions.py -> pipeline.py writes metadata.jsonl; report.py the report.
"""
