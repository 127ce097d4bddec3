"""Integrations of the store with model code (Qwen3-VL through transformers).

These modules import ``transformers`` lazily-at-import: install the ``qwen`` extra
(``pip install 'tierstore[qwen]'``) to use them. The core store never imports them.
"""
