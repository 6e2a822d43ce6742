"""Training OmniFlatten (issue 14).

The data side: a manifest of audio and transcripts (`manifest`), the speech tokenizer run
once over it into shards on disk (`shards`; the user channel streamed as a live call
streams it), and the paper's samples for each stage built from those shards (`samples`:
`TrainDataset`, `collate`). `text` turns text into the backbone's text ids; `audio`
reads the WAV files.
"""
