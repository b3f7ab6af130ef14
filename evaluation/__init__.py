"""Benchmark metrics for ID-preserving video generation (MagicMirror's Table 1).

One metric per module, each a torchmetrics Metric: id_similarity, similarity_decay,
facial_motion (FM_ref, FM_inter, and their face-normalised pair), dynamic_degree and motion_smoothness
(with flow), text_alignment, inception_score. suite.VideoEvaluator runs them all on a video; video_io
reads and writes videos; synthetic builds known-answer clips; flow_displacement measures the flow
estimators (benchmarks/flow_displacement.md).
Nothing is imported here: `evaluation.ablation_table` users should not pay for torch and dlib.
"""
