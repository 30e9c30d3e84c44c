from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TokenRequest(_message.Message):
    __slots__ = ("channel_id", "current_nonce", "signed_amount", "signature", "current_block", "claim_signature")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    CLAIM_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    channel_id: int
    current_nonce: int
    signed_amount: int
    signature: bytes
    current_block: int
    claim_signature: bytes
    def __init__(self, channel_id: _Optional[int] = ..., current_nonce: _Optional[int] = ..., signed_amount: _Optional[int] = ..., signature: _Optional[bytes] = ..., current_block: _Optional[int] = ..., claim_signature: _Optional[bytes] = ...) -> None: ...

class TokenReply(_message.Message):
    __slots__ = ("channel_id", "token", "planned_amount", "used_amount")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLANNED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    USED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    channel_id: int
    token: str
    planned_amount: int
    used_amount: int
    def __init__(self, channel_id: _Optional[int] = ..., token: _Optional[str] = ..., planned_amount: _Optional[int] = ..., used_amount: _Optional[int] = ...) -> None: ...
