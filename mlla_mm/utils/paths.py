"""How paths are joined and shown in the messages of the checks."""

from __future__ import annotations

import os.path as osp

__all__ = ['is_remote', 'join_root', 'shown']


def is_remote(path: str) -> bool:
    return '://' in str(path)


def join_root(root: str, path: str) -> str:
    return path if (not root or osp.isabs(path) or is_remote(path)) else osp.join(root, path)


def shown(path: str) -> str:
    """``path`` quoted, and for a relative path the absolute path it resolves to from here."""
    if is_remote(path) or osp.isabs(path):
        return repr(path)
    return f'{path!r} (relative to the current folder: {osp.abspath(path)})'
