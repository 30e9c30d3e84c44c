from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ChannelStateRequest(_message.Message):
    __slots__ = ("channel_id", "signature", "current_block")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    channel_id: bytes
    signature: bytes
    current_block: int
    def __init__(self, channel_id: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., current_block: _Optional[int] = ...) -> None: ...

class ChannelStateReply(_message.Message):
    __slots__ = ("current_nonce", "current_signed_amount", "current_signature", "old_nonce_signed_amount", "old_nonce_signature", "planned_amount", "used_amount")
    CURRENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SIGNED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    OLD_NONCE_SIGNED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    OLD_NONCE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PLANNED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    USED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    current_nonce: bytes
    current_signed_amount: bytes
    current_signature: bytes
    old_nonce_signed_amount: bytes
    old_nonce_signature: bytes
    planned_amount: int
    used_amount: int
    def __init__(self, current_nonce: _Optional[bytes] = ..., current_signed_amount: _Optional[bytes] = ..., current_signature: _Optional[bytes] = ..., old_nonce_signed_amount: _Optional[bytes] = ..., old_nonce_signature: _Optional[bytes] = ..., planned_amount: _Optional[int] = ..., used_amount: _Optional[int] = ...) -> None: ...

class GetFreeCallTokenRequest(_message.Message):
    __slots__ = ("address", "signature", "current_block", "user_id", "token_lifetime_in_blocks")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LIFETIME_IN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    address: str
    signature: bytes
    current_block: int
    user_id: str
    token_lifetime_in_blocks: int
    def __init__(self, address: _Optional[str] = ..., signature: _Optional[bytes] = ..., current_block: _Optional[int] = ..., user_id: _Optional[str] = ..., token_lifetime_in_blocks: _Optional[int] = ...) -> None: ...

class FreeCallToken(_message.Message):
    __slots__ = ("token", "token_hex", "token_expiration_block")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_HEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRATION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    token_hex: str
    token_expiration_block: int
    def __init__(self, token: _Optional[bytes] = ..., token_hex: _Optional[str] = ..., token_expiration_block: _Optional[int] = ...) -> None: ...

class FreeCallStateRequest(_message.Message):
    __slots__ = ("address", "user_id", "free_call_token", "signature", "current_block")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FREE_CALL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    address: str
    user_id: str
    free_call_token: bytes
    signature: bytes
    current_block: int
    def __init__(self, address: _Optional[str] = ..., user_id: _Optional[str] = ..., free_call_token: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., current_block: _Optional[int] = ...) -> None: ...

class FreeCallStateReply(_message.Message):
    __slots__ = ("free_calls_available",)
    FREE_CALLS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    free_calls_available: int
    def __init__(self, free_calls_available: _Optional[int] = ...) -> None: ...
