"""The library behind the notebooks: the image captioner of Mastering PyTorch, chapter 2 (a CNN and an LSTM)."""
