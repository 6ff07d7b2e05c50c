"""Training through growth: optimizer and learning-rate scheduler state carried onto the grown model
(``carry``), when to grow (``triggers``), and the loop that does both (``progressive.ProgressiveTrainer``)."""
