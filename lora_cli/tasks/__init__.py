"""What is trained for each task, on top of a base: its head, its loss, its own metrics.

Classification (single-label and multi-label) is the one task today: `classifier` builds the base + head + LoRA
model, `multilabel` holds the multi-label labels, loss and metrics. Its data and evaluation sit in
`data.classification` and `evaluation.classification`; a generative task adds its modules beside these.
"""
