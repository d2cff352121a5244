"""Measurement: the storage ledger, module/phase attribution, devices, and the Tracker that makes a Profile."""

from ..categories import CATEGORIES, PHASES, Category, Phase
from .tracker import Tracker, track

__all__ = ["CATEGORIES", "PHASES", "Category", "Phase", "Tracker", "track"]
