//! Text in, text out: the tekken tokenizer and the v15 chat prompt.
