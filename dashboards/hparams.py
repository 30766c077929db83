"""The HParams dashboard's three records (experiment, session start, session end) for one
run, with each value typed so TensorBoard shows it as given.

torch's ``summary.hparams`` files a bool as a number (``True`` shows as ``1.0000``), and
TensorBoard's table prints every number with five significant digits (``16.000``,
``1.0000e+5``). So bools are written as bools, ints as their decimal text (``16``; their
filter is a list of the values seen rather than a range), floats as numbers.
"""

from __future__ import annotations

_TYPES = (bool, int, float, str)


def check_hparams(hparams: dict | None) -> dict | None:
    """``hparams`` copied if it maps str names to bool/int/float/str; else ValueError."""
    if hparams is None:
        return None
    if not isinstance(hparams, dict):
        raise ValueError(f"hparams must be a dict of str to bool/int/float/str or None, "
                         f"got {type(hparams).__name__}")
    for k, v in hparams.items():
        if not isinstance(k, str) or not isinstance(v, _TYPES):
            raise ValueError(f"hparams must map str names to bool/int/float/str values, "
                             f"got {k!r}: {v!r}")
    return dict(hparams)


def _typed(value) -> tuple[str, object]:
    """(protobuf Value field, value) and the HParams data type name of one hparam."""
    if isinstance(value, bool):
        return "bool_value", value
    if isinstance(value, int):
        return "string_value", str(value)
    if isinstance(value, float):
        return "number_value", value
    return "string_value", value


_DATA_TYPE = {"bool_value": "DATA_TYPE_BOOL", "string_value": "DATA_TYPE_STRING",
              "number_value": "DATA_TYPE_FLOAT64"}


def hparams_summaries(hparams: dict, metrics: list[str]) -> list:
    """Summaries for the HParams plugin: the experiment (hparams and the ``metrics`` tags,
    read from the run's own scalar series), the session's values and its end (success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.api_pb2 import (
        DataType,
        Experiment,
        HParamInfo,
        MetricInfo,
        MetricName,
        Status,
    )
    from tensorboard.plugins.hparams.plugin_data_pb2 import (
        HParamsPluginData,
        SessionEndInfo,
        SessionStartInfo,
    )

    start = SessionStartInfo()
    infos = []
    for name, value in check_hparams(hparams).items():
        field, v = _typed(value)
        setattr(start.hparams[name], field, v)
        infos.append(HParamInfo(name=name, type=DataType.Value(_DATA_TYPE[field])))
    experiment = Experiment(hparam_infos=infos,
                            metric_infos=[MetricInfo(name=MetricName(tag=m)) for m in metrics])
    end = SessionEndInfo(status=Status.Value("STATUS_SUCCESS"))

    def summary(tag: str, **content) -> Summary:
        data = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    return [summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
            summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)]
