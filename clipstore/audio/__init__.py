"""Audio at the fetch boundary: decode, transform (voice disguise, watermark), re-encode — streaming.

Domain code: no gRPC, no SQL. `fetch` plans what one FetchClip applies (no
numpy needed to import it); `codecs` turns a clip's plaintext into float32
blocks and back; `transform` is the block protocol and the pipeline run
between them; `disguise` changes the speaker's timbre. numpy and soundfile
come with the `audio` extra and are imported only when a plan transforms.
"""

from clipstore.audio.fetch import (
    DISGUISE_NAMES,
    PROCESSABLE_TYPES,
    FetchAudio,
    FetchAudioPolicy,
    FetchPlan,
    WatermarkPlan,
    WatermarkSource,
)

__all__ = ["DISGUISE_NAMES", "PROCESSABLE_TYPES", "FetchAudio", "FetchAudioPolicy", "FetchPlan", "WatermarkPlan",
           "WatermarkSource"]
