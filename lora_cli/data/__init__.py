"""Reading text data: the classification tables and label sets, tokenizers, the SMS spam set, and where named
models and data sets live (`paths`)."""
