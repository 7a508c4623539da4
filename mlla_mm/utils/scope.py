"""The OpenMMLab library of a config: picked from its ``default_scope``, imported, registered."""

from __future__ import annotations

from mmengine.config import Config

from mlla_mm.utils.dependencies import require
from mlla_mm.utils.errors import ConfigCheckError

__all__ = ['SCOPES', 'setup_scope']

# default_scope -> what it is used for (named in error messages)
SCOPES = {'mmdet': 'detection', 'mmseg': 'segmentation', 'mmpretrain': 'classification'}


def setup_scope(cfg: Config) -> str:
    """Import the library named by ``cfg.default_scope`` and register all its modules.

    Args:
        cfg: A loaded config.

    Returns:
        str: The scope (``'mmdet'``, ``'mmseg'`` or ``'mmpretrain'``).

    Raises:
        ConfigCheckError: If the scope is missing or not one of :data:`SCOPES`.
        ImportError: If the library is not installed (naming the install command).
    """
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ConfigCheckError(
            f'default_scope={scope!r}: the tools serve configs whose default_scope is one of '
            f'{sorted(SCOPES)}; inherit a config of mmdet/mmseg/mmpretrain (e.g. '
            "_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py') or set default_scope"
        )
    require(scope, SCOPES[scope])
    utils = require(f'{scope}.utils', SCOPES[scope])
    utils.register_all_modules(init_default_scope=False)
    import mlla_mm  # noqa: F401  (registers mlla_mm.MLLA and the checkpoint allow-list)

    return scope
