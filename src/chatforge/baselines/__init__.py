"""Non-neural baselines, one folder each (the same shape as a model family), and their shared TF-IDF features."""
