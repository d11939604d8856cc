"""The model families that carry memory layers: BERT (`bert`), and the layout of their
parameter trees shared by the run library (`tables`)."""
