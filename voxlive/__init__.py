"""voxlive: live speech-to-text with Mistral's Voxtral Mini 4B Realtime."""

from .audio import AudioError, load_audio
from .checkpoint import CheckpointError
from .config import ConfigError
from .mel import log_mel
from .model import Model, load
from .rut import Rut, RutPolicy
from .session import Stream
from .transcript import Transcript, Word

__version__ = "0.1.0"
__all__ = ["load", "log_mel", "load_audio", "Model", "Stream", "Transcript", "Word", "RutPolicy", "Rut", "AudioError",
           "CheckpointError", "ConfigError", "__version__"]
