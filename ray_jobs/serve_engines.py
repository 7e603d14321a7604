"""The service's engine per layout (`caslie_core.serving.engine.Engine`), chosen once when the ingress starts:

- split / panel (`RemoteEngine`): a call to the Captioner, one to the Panel (or to each Judge_<name>, their votes
  merged), one to the Predictor with the request's adapter as Serve's multiplexed model id;
- colocated (`ColocatedEngine`): one call to the Models deployment for a request's captions and votes, or for the
  whole of a /v1/predict or an unstreamed chat (`enrich_and_answer`);
- single: the Models object built in the ingress's own replica (`caslie_core.serving.replica.LocalEngine`), no
  deployment call at all.

A call whose replica died is retried on another (idempotent); after `retries`, 503 with Retry-After.
"""

import asyncio

from caslie_core import serving as sv
from caslie_core.serving.engine import Decoding, PipelineEngine, merge_votes


class RemoteEngine(PipelineEngine):
    def __init__(self, handles: dict, *, retries: int, retry_after_s: float) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        self.handles = handles  # deployment name -> handle
        self.captioner = handles.get("Captioner")
        self.voters = [h for n, h in handles.items() if n == "Panel" or n.startswith("Judge_")]
        self.predictor = handles.get("Predictor")
        self.retries, self.retry_after_s = retries, retry_after_s
        self.retryable = (RayActorError, ActorUnavailableError)  # a replica died mid-request: retry elsewhere

    async def _call(self, make):
        """Await a deployment call; a replica that died mid-request is retried on another."""
        for attempt in range(self.retries + 1):
            try:
                return await make()
            except self.retryable as e:
                if attempt >= self.retries:
                    why = f"a model replica was lost ({type(e).__name__})"
                    raise sv.overloaded(why, self.retry_after_s) from None
                await asyncio.sleep(0.5 * 2**attempt)

    async def captions(self, pixels: list, prompts: list[str]) -> list[dict]:
        return await self._call(lambda: self.captioner.captions.remote(pixels, prompts))

    async def votes(self, questions: list[str]) -> list[dict]:
        replies = await asyncio.gather(*(self._call(lambda h=h: h.votes.remote(questions)) for h in self.voters))
        return merge_votes(list(replies))

    async def answer(self, prompt: str, decoding: Decoding) -> dict:
        handle = self.predictor.options(multiplexed_model_id=decoding.model)
        return await self._call(lambda: handle.answer.remote(prompt, decoding))

    def stream(self, prompt: str, decoding: Decoding):
        """A Serve streaming call: a client that goes away cancels it, which stops the generation."""
        handle = self.predictor.options(multiplexed_model_id=decoding.model, stream=True)
        return handle.stream.remote(prompt, decoding)

    async def health(self) -> dict[str, str]:
        async def ping(handle) -> str:
            try:
                return await asyncio.wait_for(handle.ping.remote(), 10)
            except Exception as e:  # noqa: BLE001 - reported in the health body
                return f"{type(e).__name__}: {e}"

        replies = await asyncio.gather(*(ping(h) for h in self.handles.values()))
        return dict(zip(self.handles, replies))


class ColocatedEngine(RemoteEngine):
    """One Models deployment: it captions, judges and answers; a request's enrichment is one call."""

    def __init__(self, handles: dict, **kwargs) -> None:
        super().__init__(handles, **kwargs)
        models = handles["Models"]
        self.captioner, self.voters, self.predictor = models, [models], models
        self.models = models

    async def enrich(self, subject, slots: list, stage=None):
        if not slots:
            return slots, {}
        if stage is not None:
            stage.name = "captioning and judging"
        return await self._call(lambda: self.models.enrich.remote(subject, slots))

    async def enrich_and_answer(self, subject, slots: list, decoding: Decoding, stage=None):
        if stage is not None:
            stage.name = "captioning, judging and answering"
        handle = self.models.options(multiplexed_model_id=decoding.model)
        return await self._call(lambda: handle.enrich_and_answer.remote(subject, slots, decoding))


def engine_for(layout: str, handles: dict, *, retries: int, retry_after_s: float):
    """The layout's engine over its deployment handles (layout single: the in-process Models object's own)."""
    if layout == "single":
        return handles["Models"].engine
    kind = ColocatedEngine if layout == "colocated" else RemoteEngine
    return kind(handles, retries=retries, retry_after_s=retry_after_s)
