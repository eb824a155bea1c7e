"""LoRA adapters, as the router tracks them: names, ids, the shards' GPU slots, and their users.

Every adapter the shards hold (read at start, or loaded at run time) has an id that is never reused,
so a name unloaded and loaded again is a new adapter: its KV blocks hash from a new root. The shards
have `num_slots` GPU slots; the scheduler gives a request a slot when it joins the batch (placing
its adapter in the least recently used slot that no running request holds, when it is not in one
already) and takes it back when the request leaves (finished or preempted). A request whose adapter
finds no free slot waits.

Unloading takes the name away at once (new requests get 422); the adapter itself is forgotten by the
shards once no request that named it is left (`wait_unused`).

Data-parallel replicas (`replicas`) share the names, ids and users, as every replica's shards load
and unload every adapter; each replica has its own slots (`for_replica`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict

from tgi_router.errors import ValidationError


class LoraAdapters:
    def __init__(self, names: tuple[str, ...] = (), num_slots: int = 0):
        # name -> adapter id; adapters read at start are 1, 2, ... in order.
        self.ids: dict[str, int] = {name: adapter_id for adapter_id, name in enumerate(names, 1)}
        self.num_slots = num_slots
        self._next_id = len(names) + 1
        self._users: Counter[int] = Counter()  # adapter id -> requests naming it, waiting or running
        self._slot_of: dict[int, int] = {}  # adapter id -> its slot
        self._holders: Counter[int] = Counter()  # slot -> running requests using it
        # slot -> the adapter id in it (None: empty), least recently used first
        self._slots: OrderedDict[int, int | None] = OrderedDict((slot, None) for slot in range(1, num_slots + 1))
        self._placements: list[tuple[int, int]] = []
        self._unused = asyncio.Event()
        self._views = [self]  # every replica's, sharing the state above the slots

    def for_replica(self) -> LoraAdapters:
        """Another data-parallel replica's adapters: the same names, ids and users; slots of its own."""
        view = LoraAdapters(num_slots=self.num_slots)
        view.ids, view._users, view._unused, view._views = self.ids, self._users, self._unused, self._views
        self._views.append(view)
        return view

    @property
    def names(self) -> list[str]:
        return list(self.ids)

    def new_id(self) -> int:
        """An id for an adapter about to be loaded (registered by `add` once the shards hold it)."""
        adapter_id, self._next_id = self._next_id, self._next_id + 1
        return adapter_id

    def add(self, name: str, adapter_id: int) -> None:
        self.ids[name] = adapter_id

    def remove(self, name: str) -> int:
        """Takes `name` away; returns its id (KeyError if not loaded)."""
        return self.ids.pop(name)

    def hold(self, adapter_id: int) -> None:
        """A request naming `adapter_id` arrived; ValidationError if the adapter was unloaded since
        the request was validated (the shards may be forgetting it)."""
        if adapter_id:
            if adapter_id not in self.ids.values():
                raise ValidationError("the request's adapter was unloaded while it was being validated")
            self._users[adapter_id] += 1

    def drop(self, adapter_id: int) -> None:
        """A request naming `adapter_id` ended."""
        if adapter_id:
            self._users[adapter_id] -= 1
            if not self._users[adapter_id]:
                del self._users[adapter_id]
                self._unused.set()

    async def wait_unused(self, adapter_id: int) -> None:
        """Returns once no request names `adapter_id`; then it leaves its slot."""
        while self._users[adapter_id]:
            self._unused.clear()
            await self._unused.wait()
        del self._users[adapter_id]
        for view in self._views:
            slot = view._slot_of.pop(adapter_id, None)
            if slot is not None:
                view._slots[slot] = None

    def acquire(self, adapter_id: int) -> int | None:
        """The slot for a request of `adapter_id` joining the batch: the adapter's own, or the least
        recently used one no running request holds (the adapter is placed there before the next
        step); None when every slot is held."""
        slot = self._slot_of.get(adapter_id)
        if slot is None:
            free = [slot for slot in self._slots if not self._holders[slot]]
            if not free:
                return None
            slot = next((slot for slot in free if self._slots[slot] is None), free[0])
            evicted = self._slots[slot]
            if evicted is not None:
                del self._slot_of[evicted]
            self._slots[slot] = adapter_id
            self._slot_of[adapter_id] = slot
            self._placements.append((slot, adapter_id))
        self._slots.move_to_end(slot)
        self._holders[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """A running request using `slot` left the batch."""
        self._holders[slot] -= 1

    def take_placements(self) -> list[tuple[int, int]]:
        """(slot, adapter id) placed since the last call, for the next step to carry."""
        placements, self._placements = self._placements, []
        return placements
