from .djb_hash import djb_hash
from .cdblib import Reader, Reader64, Writer, Writer64


__all__ = ['djb_hash', 'Reader', 'Reader64', 'Writer', 'Writer64']
