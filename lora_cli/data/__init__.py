"""Reading text data: the classification tables and label sets, the instruction records with their prompt
styles and batches, tokenizers, the SMS spam set, and where named models and data sets live (`paths`)."""
