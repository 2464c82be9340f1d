"""One host copy of each model file for all workers: ``store`` keeps the copies and hands each worker a view;
``comfy_adapter.shared_weights`` routes ComfyUI's loaders through it. Importing ``store`` imports torch, so this
``__init__`` stays empty (the launcher must not import torch before ComfyUI does).
"""
