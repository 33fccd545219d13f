import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_SOURCE_UNSPECIFIED: _ClassVar[FeedbackSource]
    FEEDBACK_SOURCE_END_USER: _ClassVar[FeedbackSource]
    FEEDBACK_SOURCE_ANNOTATOR: _ClassVar[FeedbackSource]

class PairwiseChoice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAIRWISE_CHOICE_UNSPECIFIED: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_A: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_B: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_TIE: _ClassVar[PairwiseChoice]
    PAIRWISE_CHOICE_BOTH_BAD: _ClassVar[PairwiseChoice]

class SubmitStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMIT_STATUS_UNSPECIFIED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_ACCEPTED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_DUPLICATE: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_REJECTED: _ClassVar[SubmitStatus]
FEEDBACK_SOURCE_UNSPECIFIED: FeedbackSource
FEEDBACK_SOURCE_END_USER: FeedbackSource
FEEDBACK_SOURCE_ANNOTATOR: FeedbackSource
PAIRWISE_CHOICE_UNSPECIFIED: PairwiseChoice
PAIRWISE_CHOICE_A: PairwiseChoice
PAIRWISE_CHOICE_B: PairwiseChoice
PAIRWISE_CHOICE_TIE: PairwiseChoice
PAIRWISE_CHOICE_BOTH_BAD: PairwiseChoice
SUBMIT_STATUS_UNSPECIFIED: SubmitStatus
SUBMIT_STATUS_ACCEPTED: SubmitStatus
SUBMIT_STATUS_DUPLICATE: SubmitStatus
SUBMIT_STATUS_REJECTED: SubmitStatus

class PairwiseJudgement(_message.Message):
    __slots__ = ("completion_a_id", "completion_b_id", "choice")
    COMPLETION_A_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_B_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    completion_a_id: str
    completion_b_id: str
    choice: PairwiseChoice
    def __init__(self, completion_a_id: _Optional[str] = ..., completion_b_id: _Optional[str] = ..., choice: _Optional[_Union[PairwiseChoice, str]] = ...) -> None: ...

class RatingJudgement(_message.Message):
    __slots__ = ("completion_id", "score", "thumbs_up", "scale_min", "scale_max")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THUMBS_UP_FIELD_NUMBER: _ClassVar[int]
    SCALE_MIN_FIELD_NUMBER: _ClassVar[int]
    SCALE_MAX_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    score: float
    thumbs_up: bool
    scale_min: float
    scale_max: float
    def __init__(self, completion_id: _Optional[str] = ..., score: _Optional[float] = ..., thumbs_up: _Optional[bool] = ..., scale_min: _Optional[float] = ..., scale_max: _Optional[float] = ...) -> None: ...

class RankingJudgement(_message.Message):
    __slots__ = ("completion_ids",)
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    completion_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, completion_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CriterionMark(_message.Message):
    __slots__ = ("criterion", "completion_id", "value")
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    criterion: str
    completion_id: str
    value: float
    def __init__(self, criterion: _Optional[str] = ..., completion_id: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("event_id", "created_at", "tenant", "source", "annotator_id", "project", "pairwise", "rating", "ranking", "criteria", "marks", "comment", "calibration", "anchor", "item_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    MARKS_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    created_at: _timestamp_pb2.Timestamp
    tenant: str
    source: FeedbackSource
    annotator_id: str
    project: str
    pairwise: PairwiseJudgement
    rating: RatingJudgement
    ranking: RankingJudgement
    criteria: _containers.RepeatedScalarFieldContainer[str]
    marks: _containers.RepeatedCompositeFieldContainer[CriterionMark]
    comment: str
    calibration: bool
    anchor: bool
    item_id: str
    def __init__(self, event_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant: _Optional[str] = ..., source: _Optional[_Union[FeedbackSource, str]] = ..., annotator_id: _Optional[str] = ..., project: _Optional[str] = ..., pairwise: _Optional[_Union[PairwiseJudgement, _Mapping]] = ..., rating: _Optional[_Union[RatingJudgement, _Mapping]] = ..., ranking: _Optional[_Union[RankingJudgement, _Mapping]] = ..., criteria: _Optional[_Iterable[str]] = ..., marks: _Optional[_Iterable[_Union[CriterionMark, _Mapping]]] = ..., comment: _Optional[str] = ..., calibration: _Optional[bool] = ..., anchor: _Optional[bool] = ..., item_id: _Optional[str] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("event_id", "status", "field", "reason")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    status: SubmitStatus
    field: str
    reason: str
    def __init__(self, event_id: _Optional[str] = ..., status: _Optional[_Union[SubmitStatus, str]] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeedbackEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeedbackEvent, _Mapping]]] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class AgreementRequest(_message.Message):
    __slots__ = ("project", "calibration_only", "tenant")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ONLY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    project: str
    calibration_only: bool
    tenant: str
    def __init__(self, project: _Optional[str] = ..., calibration_only: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class AgreementReport(_message.Message):
    __slots__ = ("items", "judgements", "annotators", "percent_agreement", "kappa", "kappa_method", "annotators_quality")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATORS_FIELD_NUMBER: _ClassVar[int]
    PERCENT_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    KAPPA_METHOD_FIELD_NUMBER: _ClassVar[int]
    ANNOTATORS_QUALITY_FIELD_NUMBER: _ClassVar[int]
    items: int
    judgements: int
    annotators: int
    percent_agreement: float
    kappa: float
    kappa_method: str
    annotators_quality: _containers.RepeatedCompositeFieldContainer[AnnotatorQuality]
    def __init__(self, items: _Optional[int] = ..., judgements: _Optional[int] = ..., annotators: _Optional[int] = ..., percent_agreement: _Optional[float] = ..., kappa: _Optional[float] = ..., kappa_method: _Optional[str] = ..., annotators_quality: _Optional[_Iterable[_Union[AnnotatorQuality, _Mapping]]] = ...) -> None: ...

class AnnotatorQuality(_message.Message):
    __slots__ = ("annotator_id", "anchors", "anchor_accuracy", "recent_anchor_accuracy", "majority_agreement")
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    RECENT_ANCHOR_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    annotator_id: str
    anchors: int
    anchor_accuracy: float
    recent_anchor_accuracy: float
    majority_agreement: float
    def __init__(self, annotator_id: _Optional[str] = ..., anchors: _Optional[int] = ..., anchor_accuracy: _Optional[float] = ..., recent_anchor_accuracy: _Optional[float] = ..., majority_agreement: _Optional[float] = ...) -> None: ...
