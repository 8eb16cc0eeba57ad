"""LoRA itself: the LoRA settings type and scale formulas (`spec`, torch-free) and the layers, fused autograd
nodes and module surgery that install LoRA on a model (`layers`)."""
