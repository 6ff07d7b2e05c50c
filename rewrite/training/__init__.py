"""Training through growth: optimizer and learning-rate scheduler state carried onto the grown model
(``carry``), and when to grow (``triggers``)."""
