"""Curvature capture, Kronecker and dense blocks, and factor eigendecomposition."""

from kldwrm_fast.curvature.base import Curvature, DenseCurvature
from kldwrm_fast.curvature.blocks import DenseBlock, FactoredBlock, KroneckerBlock
from kldwrm_fast.curvature.capture import KroneckerCurvature

__all__ = ["Curvature", "DenseBlock", "DenseCurvature", "FactoredBlock", "KroneckerBlock", "KroneckerCurvature"]
