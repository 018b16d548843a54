"""Statistics over flat chunks of tensors: the device-side arithmetic, with no hooks and no step state."""
