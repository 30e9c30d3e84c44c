from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetPaymentsListRequest(_message.Message):
    __slots__ = ("mpe_address", "current_block", "signature")
    MPE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    mpe_address: str
    current_block: int
    signature: bytes
    def __init__(self, mpe_address: _Optional[str] = ..., current_block: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StartClaimRequest(_message.Message):
    __slots__ = ("mpe_address", "channel_id", "signature")
    MPE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    mpe_address: str
    channel_id: bytes
    signature: bytes
    def __init__(self, mpe_address: _Optional[str] = ..., channel_id: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PaymentReply(_message.Message):
    __slots__ = ("channel_id", "channel_nonce", "signed_amount", "signature", "channel_expiry")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    channel_id: bytes
    channel_nonce: bytes
    signed_amount: bytes
    signature: bytes
    channel_expiry: bytes
    def __init__(self, channel_id: _Optional[bytes] = ..., channel_nonce: _Optional[bytes] = ..., signed_amount: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., channel_expiry: _Optional[bytes] = ...) -> None: ...

class PaymentsListReply(_message.Message):
    __slots__ = ("payments",)
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    payments: _containers.RepeatedCompositeFieldContainer[PaymentReply]
    def __init__(self, payments: _Optional[_Iterable[_Union[PaymentReply, _Mapping]]] = ...) -> None: ...

class StartMultipleClaimRequest(_message.Message):
    __slots__ = ("mpe_address", "channel_ids", "current_block", "signature")
    MPE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_IDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    mpe_address: str
    channel_ids: _containers.RepeatedScalarFieldContainer[int]
    current_block: int
    signature: bytes
    def __init__(self, mpe_address: _Optional[str] = ..., channel_ids: _Optional[_Iterable[int]] = ..., current_block: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...
