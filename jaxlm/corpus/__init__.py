"""Real corpora, streamed: sources of documents -> tokens -> a sharded token store on disk.

  sources       text files and globs (plain, .gz, .xz, .zst), JSON Lines, Parquet and saved
                Hugging Face datasets, local or gs://, streamed document by document
  streams       opening files as byte streams (local or gs://, gzip / xz / zstd)
  store         the token store's format (shards, indexes, manifest) and its memory-mapped reader
  store_writer  writing a store atomically, resuming after an interrupted write

These are the building blocks of `jaxlm prepare`; training does not read a store yet (it still
tokenizes `data.path` in memory through jaxlm/data.py).
"""
