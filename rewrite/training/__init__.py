"""Training through growth: optimizer and learning-rate scheduler state carried onto the grown model."""
