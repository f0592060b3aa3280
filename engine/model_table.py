"""The served models: which runner answers each name and version, the aliases being
followed, the runners being retired, and the watchdog over all of them.

The table knows nothing of HTTP: the App (engine/server.py) routes requests to the runners
it holds, and is told through `on_change` when the set of served runners changes (to drop
cached routes and resync the native front end).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from .rollout import Split
from .runtime import STATUS_ERROR, ModelRunner

log = logging.getLogger("vivace.server")


def version_key(version: str):
    """Sort order of version strings: numbers numerically, then names."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class ModelTable:
    def __init__(self, on_change: Callable[[], None] = lambda: None):
        self.models: dict[str, dict[str, ModelRunner]] = {}
        self.latest: dict[str, ModelRunner] = {}
        self.followers: dict[str, asyncio.Task] = {}  # model name -> task following its alias
        self.retiring: set[ModelRunner] = set()  # replaced or unloaded, finishing their queues
        self.splits: dict[str, Split] = {}  # model name -> its rollout's split (engine/rollout.py)
        self.on_change = on_change

    def runners(self) -> list[ModelRunner]:
        return [r for versions in self.models.values() for r in versions.values()]

    def watched(self) -> list[ModelRunner]:
        """Served and retiring runners: what the watchdog and the deadline expirer cover."""
        return [*self.runners(), *self.retiring]

    def versions(self, name: str) -> list[str]:
        return sorted(self.models[name], key=version_key)

    def add(self, runner: ModelRunner) -> None:
        self.models.setdefault(runner.name, {})[runner.version] = runner
        current = self.latest.get(runner.name)
        if current is None or version_key(runner.version) >= version_key(current.version):
            self.latest[runner.name] = runner
        self.on_change()

    def replace(self, new: ModelRunner) -> None:
        """Route `new`'s name to it alone from now on; requests already queued on the runners
        it replaces finish there (see retire)."""
        self.models[new.name] = {new.version: new}
        self.latest[new.name] = new
        self.splits.pop(new.name, None)
        self.on_change()

    def apply_split(self, name: str, stable: ModelRunner, split: Split | None) -> None:
        """Serve `name` by `split` (its stable, canary and shadow runners, each also under
        its version), or by `stable` alone when None."""
        runners = split.runners() if split is not None else [stable]
        self.models[name] = {r.version: r for r in runners}
        self.latest[name] = stable
        if split is None:
            self.splits.pop(name, None)
        else:
            self.splits[name] = split
        self.on_change()

    def remove(self, name: str) -> dict[str, ModelRunner]:
        """Stop serving `name`; its runners are retired (queued requests finish)."""
        self.stop_following(name)
        versions = self.models.pop(name)
        self.latest.pop(name, None)
        self.splits.pop(name, None)
        self.on_change()
        for previous in versions.values():
            self.retire(previous)
        return versions

    def install(self, runner: ModelRunner, follower: AliasFollower | None = None) -> None:
        """Serve `runner` under its name from now on, retiring what served that name, and
        keep following an alias when `follower` is given."""
        runner.attach(asyncio.get_running_loop())
        old = self.models.get(runner.name, {})
        self.stop_following(runner.name)
        if old:
            self.replace(runner)
            for previous in old.values():
                self.retire(previous)
        else:
            self.add(runner)
        if follower is not None:
            self.follow(follower)

    # -- alias followers --------------------------------------------------------------------
    def follow(self, follower: AliasFollower) -> None:
        name = follower.runner.name
        self.stop_following(name)
        self.followers[name] = asyncio.get_running_loop().create_task(follower.follow(self))

    def stop_following(self, name: str) -> None:
        task = self.followers.pop(name, None)
        if task is not None:
            task.cancel()

    def stop_all_following(self) -> None:
        for name in list(self.followers):
            self.stop_following(name)

    # -- retirement -------------------------------------------------------------------------
    def retire(self, runner: ModelRunner) -> None:
        """Stop routing to `runner`: it finishes what it queued (still watched by the sweep,
        so a hung batch's requests fail and deadlines hold), then closes."""
        self.retiring.add(runner)
        asyncio.get_running_loop().create_task(self._retire(runner))

    async def _retire(self, runner: ModelRunner) -> None:
        try:
            # Closing joins the executor threads: wait for no batch to run, so that a hung
            # backend never blocks the loop.
            while runner.waiting or runner.running:
                await asyncio.sleep(0.01)
            runner.close(drain=True)
        finally:
            self.retiring.discard(runner)

    # -- watchdog ---------------------------------------------------------------------------
    def watch(self, now: float) -> None:
        """Fail the requests of batches that overran the execution timeout (see check_hung)."""
        for runner in self.watched():
            was_hung = runner.hung
            stuck = runner.check_hung(now)
            context = {"model": runner.name, "version": runner.version}  # fields of a JSON log line
            if runner.hung and not was_hung:
                log.error("model %s version %s: a batch has run longer than %.1f s; failing its requests and "
                          "refusing new ones until the backend returns", runner.name, runner.version,
                          runner.execution_timeout_s, extra=context)
            elif was_hung and not runner.hung:
                log.warning("model %s version %s: the overrunning batch returned; serving again",
                            runner.name, runner.version, extra=context)
            message = f"a batch ran longer than the execution timeout of {runner.execution_timeout_s:g} s"
            for token in stuck:
                waiter = runner.waiting.pop(token, None)
                if waiter is not None:
                    waiter.done(STATUS_ERROR, message)


class AliasFollower:
    """Keeps a served `name@alias` on the version the alias points to, and applies the
    alias's rollout (a canary and/or shadow version, registry/rollouts.py) when it has one.

    `current()` returns the version the registry resolves now; `load(version)` builds a
    runner for it (in a worker thread: loading a model must not stall the loop);
    `rollout()` returns the alias's rollout or None. When the alias moves - a promotion or
    a rollback - the new version takes new requests at once and the old one finishes what
    it had queued, then closes: no request fails.
    """

    def __init__(self, ref: str, runner: ModelRunner, current, load, interval: float = 1.0,
                 rollout: Callable[[], Any] | None = None):
        self.ref = ref
        self.runner = runner
        self.current = current
        self.load = load
        self.interval = interval
        self.rollout = rollout
        self.refused: set[str] = set()  # versions that failed warm-up: not loaded again
        self.extra: dict[str, ModelRunner] = {}  # version -> canary or shadow runner

    async def follow(self, table: ModelTable) -> None:
        while True:  # the first pass is the server's, before it accepts connections (catch_up)
            await asyncio.sleep(self.interval)
            await self.catch_up(table)

    async def catch_up(self, table: ModelTable) -> None:
        """Serve what the registry names now: the alias's version and its rollout. The
        server calls this once before it accepts connections, so that a process started
        during a rollout (a worker of --workers, a restart) splits from its first request."""
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(None, self.current)
            rollout = await loop.run_in_executor(None, self.rollout) if self.rollout is not None else None
            if version != self.runner.version and version not in self.refused:
                await self._move(table, version)
            await self._apply(table, rollout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the registry or a new package failed: keep serving
            log.error("%s: cannot follow the registry: %s", self.ref, exc)

    async def _runner(self, version: str) -> ModelRunner | None:
        """A loaded, attached runner for `version` (one already held is reused), or None
        when it fails warm-up."""
        held = self.extra.pop(version, None)
        if held is not None:
            return held
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(None, self.load, version)
        try:
            new = await asyncio.shield(loading)
        except asyncio.CancelledError:  # unfollowed while loading: free what the load builds
            loading.add_done_callback(_close_unused)
            raise
        if new.unavailable_reason:  # never serve a broken version
            log.error("%s: not serving version %s: %s", self.ref, new.version, new.unavailable_reason)
            self.refused.add(new.version)
            new.close(drain=False)
            return None
        new.attach(loop)
        return new

    async def _move(self, table: ModelTable, version: str) -> None:
        new = await self._runner(version)
        if new is None:
            return
        old, self.runner = self.runner, new
        split = table.splits.get(new.name)
        table.replace(new)
        log.info("%s moved: serving %s version %s (was %s)", self.ref, new.name, new.version, old.version)
        if split is not None and old in (split.canary, split.shadow):
            self.extra[old.version] = old  # still the rollout's; _apply decides
        else:
            table.retire(old)

    async def _apply(self, table: ModelTable, rollout: Any) -> None:
        """Serve the rollout's canary and shadow next to the stable runner (or stop)."""
        stable = self.runner
        wanted = {} if rollout is None else {
            role: str(v) for role, v in (("canary", rollout.canary), ("shadow", rollout.shadow))
            if v is not None and str(v) != stable.version and str(v) not in self.refused}
        runners: dict[str, ModelRunner] = {}
        for role, version in wanted.items():
            runner = next((r for r in runners.values() if r.version == version), None) or await self._runner(version)
            if runner is not None:
                runners[role] = runner
        for runner in self.extra.values():  # versions the rollout no longer names
            if runner not in runners.values():
                table.retire(runner)
        self.extra = {r.version: r for r in runners.values()}
        current = table.splits.get(stable.name)
        if not runners:
            if current is not None:
                table.apply_split(stable.name, stable, None)
                log.info("%s: rollout over; every request to version %s", self.ref, stable.version)
            return
        args = (stable, runners.get("canary"), float(rollout.weight), rollout.sticky, runners.get("shadow"),
                float(rollout.shadow_sample), rollout.policy)
        if current is not None and current.same(*args):
            return
        table.apply_split(stable.name, stable, Split(self.ref, *args))
        log.info("%s: rollout applied: canary %s at %g%%, shadow %s", self.ref,
                 runners["canary"].version if "canary" in runners else "none", rollout.weight,
                 runners["shadow"].version if "shadow" in runners else "none")


def registry_follower(ref: str, runner: ModelRunner, home: str, loader: Callable[[str], ModelRunner],
                      interval: float = 1.0) -> AliasFollower:
    """An AliasFollower for NAME@ALIAS that resolves it, and its rollout, in the registry
    at `home`."""
    from vivace.registry.models import get_version
    from vivace.registry.rollouts import get_rollout

    name, _, alias = ref.partition("@")
    has_rollouts = alias != "latest" and not alias.isdigit()
    return AliasFollower(ref, runner, lambda: str(get_version(home, ref).version),
                         lambda version: loader(f"{name}/{version}"), interval,
                         rollout=(lambda: get_rollout(home, ref)) if has_rollouts else None)


def _close_unused(loading: asyncio.Future) -> None:
    if not loading.cancelled() and loading.exception() is None:
        loading.result().close(drain=False)
