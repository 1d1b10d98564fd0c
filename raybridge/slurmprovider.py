"""The autoscaler configs of clusters started by earlier raybridge versions name this module."""

from raybridge.autoscaler.provider import SlurmNodeProvider

__all__ = ["SlurmNodeProvider"]
