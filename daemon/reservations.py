"""A node's memory reservations: a pure ledger (no I/O, no clocks).

A node admits a reservation only if everything it has admitted, plus this
one, fits in its usable memory. Admission happens on the node itself, one
request at a time, so two placements racing through different nodes can
never overcommit it. Unconfirmed reservations lapse at their expiry."""

from dataclasses import dataclass, field, replace

from exod.proto import exod_pb2 as pb


@dataclass(frozen=True)
class Ledger:
    held: dict = field(default_factory=dict)  # reservation id -> Reservation

    def reserved_bytes(self) -> int:
        return sum(r.bytes for r in self.held.values())


def admit(ledger: Ledger, reservation: pb.Reservation, usable: int) -> tuple[Ledger, bool, str]:
    if not reservation.reservation_id or reservation.bytes <= 0:
        return ledger, False, "a reservation needs an id and a positive size"
    if reservation.reservation_id in ledger.held:
        same = ledger.held[reservation.reservation_id].bytes == reservation.bytes
        return ledger, same, "" if same else "reservation id already holds a different size"
    reserved = ledger.reserved_bytes()
    if reserved + reservation.bytes > usable:
        return ledger, False, (f"needs {reservation.bytes / 1e9:.2f} GB but only "
                               f"{max(0, usable - reserved) / 1e9:.2f} GB of {usable / 1e9:.2f} GB is unreserved")
    held = dict(ledger.held)
    copy = pb.Reservation()
    copy.CopyFrom(reservation)
    held[reservation.reservation_id] = copy
    return replace(ledger, held=held), True, ""


def confirm(ledger: Ledger, reservation_id: str) -> Ledger:
    """The placement went ahead: hold until released."""
    current = ledger.held.get(reservation_id)
    if current is None:
        return ledger
    kept = pb.Reservation()
    kept.CopyFrom(current)
    kept.expires_at_unix_ms = 0
    return replace(ledger, held={**ledger.held, reservation_id: kept})


def release(ledger: Ledger, reservation_id: str) -> tuple[Ledger, bool]:
    if reservation_id not in ledger.held:
        return ledger, False
    held = dict(ledger.held)
    del held[reservation_id]
    return replace(ledger, held=held), True


def expire(ledger: Ledger, now_ms: int) -> Ledger:
    lapsed = [k for k, r in ledger.held.items() if 0 < r.expires_at_unix_ms <= now_ms]
    if not lapsed:
        return ledger
    return replace(ledger, held={k: r for k, r in ledger.held.items() if k not in lapsed})
