"""Patch of how ComfyUI numbers saved files (``folder_paths``, ``SaveImage``): two workers never get one number."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable

from .base import CHECKED, Comfy, Patch, require_callables, require_modules, require_parameters, require_signature


class UniqueSaveCounters(Patch):
    name = "unique-save-counters"
    replaces = ("folder_paths.get_save_image_path; nodes.SaveImage.save_images and, where it exists (0.3.75), "
                "comfy_api.latest._ui.ImageSaveHelper.save_images, to learn how many files a call writes")
    why = ("the next file number comes from listing the output folder, so two workers saving under one prefix at "
           "once got the same number and one image overwrote the other (2xH200: /view served another prompt's or "
           "a half-written PNG). Numbers are now handed out under a lock and a number stays taken once handed "
           "out, for as many files as the saving node writes (one where that is not known)")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        save_image = getattr(comfy.nodes, "SaveImage", None)
        if save_image is None:
            return "nodes.SaveImage is missing"
        return (require_modules("folder_paths") or require_callables(sys.modules["folder_paths"], "get_save_image_path")
                or require_callables(save_image, "save_images")
                or require_signature(sys.modules["folder_paths"].get_save_image_path,
                                     "folder_paths.get_save_image_path", "filename_prefix", "output_dir",
                                     "image_width", "image_height")
                or require_parameters(save_image.save_images, "SaveImage.save_images", "self", "images"))

    def _apply(self, comfy: Comfy) -> None:
        fp = sys.modules["folder_paths"]
        original = fp.get_save_image_path
        lock = threading.Lock()
        next_free: dict[tuple[str, str], int] = {}
        files_per_call = threading.local()

        def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                                image_height: int = 0) -> tuple[str, str, int, str, str]:
            with lock:
                folder, filename, counter, subfolder, prefix = original(filename_prefix, output_dir, image_width,
                                                                        image_height)
                key = (os.path.normcase(os.path.abspath(folder)), os.path.normcase(filename))
                counter = max(counter, next_free.get(key, counter))
                next_free[key] = counter + max(1, getattr(files_per_call, "n", 1))
            return folder, filename, counter, subfolder, prefix

        def announcing(save: Callable, images_at: int) -> Callable:
            def save_images(*args: Any, **kwargs: Any) -> Any:
                images = kwargs.get("images", args[images_at] if len(args) > images_at else None)
                files_per_call.n = len(images) if images is not None else 1
                try:
                    return save(*args, **kwargs)
                finally:
                    files_per_call.n = 1
            save_images.__wrapped__ = save  # type: ignore[attr-defined]
            return save_images

        get_save_image_path.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace_everywhere(fp, "get_save_image_path", get_save_image_path)
        save_image = comfy.nodes.SaveImage
        self.log.replace(save_image, "save_images", announcing(save_image.save_images, 1))
        helper = getattr(sys.modules.get("comfy_api.latest._ui"), "ImageSaveHelper", None)
        if helper is not None and isinstance(helper.__dict__.get("save_images"), staticmethod):
            self.log.replace(helper, "save_images", staticmethod(announcing(helper.save_images, 0)))
