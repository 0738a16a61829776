"""Audio at the fetch boundary: decode, transform (voice disguise, watermark), re-encode — streaming.

Domain code: no gRPC, no SQL. `codecs` turns a clip's plaintext into float32
blocks and back; `transform` is the block protocol and the pipeline FetchClip
runs between them; `disguise` changes the speaker's timbre.
"""
