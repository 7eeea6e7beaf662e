"""Pure numerics: tensors in, tensors out. No nn.Module, no hooks, no I/O."""
