"""Real corpora (`data.sources`), streamed: sources of documents -> tokens -> token stores -> rows.

  spec          the data.sources config section, checked before anything is read; the store key
  sources       text files and globs (plain, .gz, .xz, .zst), JSON Lines, Parquet and saved
                Hugging Face datasets, local or gs://, streamed document by document
  streams       opening files as byte streams (local or gs://, gzip / xz / zstd)
  store         the token store's format (shards, indexes, manifest) and its memory-mapped reader
  store_writer  writing a store atomically, resuming after an interrupted write
  prepare       `jaxlm prepare`: the tokenizer, then every document into a train and a val store
  batches       training rows of a mixture (windows or document-aligned) and the eval sets

`data.path` (one corpus held in memory) is read by jaxlm/data.py instead; both give training the
same interface (train_batch, eval_sets, tokenizer).
"""
