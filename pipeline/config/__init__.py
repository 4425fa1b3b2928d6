"""Configuration: typed params loaded once from params.yaml (`params`), and every artefact path in
one place (`paths`). Import from here; `python -m pipeline.config [params.yaml]` checks a params file.

Bad params fail at load, before any work starts, with one line naming the param
(`ConfigError: train.arch: unknown architecture 'foo' ...`).
"""
from pipeline.config.params import (SOURCES, AuditParams, AugmentParams, CamParams, ChexpertParams, ComputeParams, ConfigError, CycleItem,
                                    DataParams, EngineParams, EnhanceParams, EvaluateParams, FlowParams,
                                    KermanyParams, NihParams, Params, PhantomParams, ReportParams, SanityParams,
                                    SegmentParams, SplitFractions, TrainParams, Uncertainty, load_params)
from pipeline.config.paths import Paths, real_data_dir

__all__ = ["SOURCES", "AuditParams", "AugmentParams", "CamParams", "ChexpertParams", "ComputeParams", "ConfigError", "CycleItem", "DataParams",
           "EngineParams", "EnhanceParams", "EvaluateParams", "FlowParams", "KermanyParams", "NihParams", "Params",
           "Paths", "real_data_dir", "PhantomParams", "ReportParams", "SanityParams", "SegmentParams", "SplitFractions",
           "TrainParams", "Uncertainty", "load_params"]
