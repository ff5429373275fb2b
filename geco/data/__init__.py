"""Data: split files, images by id, the synthetic default, shards (writer, S3 storage, streaming
reader), transforms, and `source.open_data`, the one way in for every consumer."""
