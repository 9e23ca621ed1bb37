"""Encoders (feature extractors) for the panoptic models."""

from panoptem.models.encoders.resnet import ENCODERS, ResNet, build_resnet, load_encoder_weights

__all__ = ["ENCODERS", "ResNet", "build_resnet", "load_encoder_weights"]
