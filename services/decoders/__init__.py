"""Decoder workers: diffusers pipelines that turn conditioning into PNG / MP4 / WAV artifacts."""
