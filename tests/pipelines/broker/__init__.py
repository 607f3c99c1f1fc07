"""Tests of pipelines.broker."""
