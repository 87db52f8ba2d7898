"""Local speech-to-text for voice and round-video notes: faster-whisper (CTranslate2) in a
worker thread of its own, audio decoded in-process with PyAV. Nothing leaves the machine.

The rest of doppelbot sees only ``doppelbot.core.ports.Transcriber`` and ``Transcript``; this
package is the one place (besides the model, training and knowledge modules) that imports
``faster_whisper``, ``ctranslate2`` or ``av``, and it does so inside functions, so importing it
stays cheap.

- ``audio``: decode a note (OGG/Opus, MP4/AAC, any container FFmpeg reads) to 16 kHz mono,
  refusing one longer than the limit before decoding it all.
- ``model``: ``WhisperSpec`` and ``load_whisper`` — the one function that loads a model (a
  size name, a hub id or a local folder).
- ``engine``: one transcription on a loaded model, with a check between 30-second windows.
- ``worker``: ``TranscriptionWorker``, the thread that owns the model (implements
  ``Transcriber``).
"""

from __future__ import annotations

from doppelbot.speech.model import WhisperSpec
from doppelbot.speech.worker import TranscriptionWorker

__all__ = ["TranscriptionWorker", "WhisperSpec"]
