# The parts of pymilter's Milter package that routemilter uses (see ../milter.pyi).
from collections.abc import Callable
from typing import TypeVar

from milter import CONTINUE as CONTINUE
from milter import DISCARD as DISCARD
from milter import NOREPLY as NOREPLY
from milter import REJECT as REJECT
from milter import TEMPFAIL as TEMPFAIL
from milter import milterContext

_Callback = TypeVar("_Callback", bound=Callable[..., int])

# Actions (smfi_negotiate's first word).
ADDHDRS: int
CHGHDRS: int
ADDRCPT: int
DELRCPT: int
CHGFROM: int
SETSYMLIST: int
CURR_ACTS: int
# Protocol steps (its second word).
P_NOCONNECT: int
P_NOHELO: int
P_NOBODY: int
P_NOHDRS: int
P_NOEOH: int
# Macro stages (setsymlist).
M_CONNECT: int
M_HELO: int
M_ENVFROM: int
M_ENVRCPT: int
M_DATA: int
M_EOH: int
M_EOM: int

class Base:
    _ctx: milterContext
    _actions: int
    _protocol: int
    def _setctx(self, ctx: milterContext | None) -> None: ...
    @classmethod
    def protocol_mask(cls) -> int: ...
    def getsymval(self, sym: str) -> str | None: ...
    def setreply(self, rcode: str, xcode: str | None = ..., msg: str | None = ..., *ml: str) -> None: ...
    def addheader(self, field: str, value: str, idx: int = ...) -> None: ...
    def chgheader(self, field: str, idx: int, value: str) -> None: ...
    def addrcpt(self, rcpt: str, params: str | None = ...) -> None: ...
    def delrcpt(self, rcpt: str) -> None: ...
    def chgfrom(self, sender: str, params: str | None = ...) -> None: ...

factory: Callable[[], Base]

def nocallback(func: _Callback) -> _Callback: ...
def noreply(func: _Callback) -> _Callback: ...
def decode(strategy: str) -> Callable[[_Callback], _Callback]: ...
def negotiate_callback(ctx: milterContext, opts: list[int]) -> int: ...
def connect_callback(ctx: milterContext, hostname: str, family: int, hostaddr: object) -> int: ...
def close_callback(ctx: milterContext) -> int: ...
