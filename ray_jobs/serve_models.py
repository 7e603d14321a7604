"""The model deployments of the service (`ray_jobs.serve` builds the app, `ServeConfig.layout` picks which):
Captioner, Judge_<name> and Predictor (layout split), Panel (all judges in one replica, layout panel), Models
(captioner, panel and predictor in one replica, layout colocated; the same object runs inside the ingress's own
replica in layout single).

Each is a thin shell over the core's model parts (`caslie_core.serving.replica`): it builds its models once (the
registry: `models.registry`), gives the parts Ray's metrics and Serve's adapter multiplexing, reports itself
unhealthy when it fails every item of several batches in a row, and takes its live settings (batching) through
Serve's `user_config` -> `reconfigure()`, so a tuning change reaches running replicas without reloading a model.
"""

from ray import serve

from caslie_core.config.serve import BatchingSettings, ServeCaptionerConfig, ServeJudgeConfig
from caslie_core.models.registry import build_captioner, build_judge
from caslie_core.serving.engine import Decoding
from caslie_core.serving.replica import AnswerPart, CaptionPart, LocalEngine, PanelPart, Replica, adapter_loader

from . import counters, metrics


class _Shell:
    """What every model deployment does alike: its `Replica` (metrics wired in), health, live settings, ping."""

    def _replica(self, *, shared: bool = False) -> Replica:
        self.redone = counters.Counts()  # a first batch redone item by item is seen (its series starts at zero)
        self.replica = Replica(
            shared=shared,
            on_batch=lambda label, n: metrics.observe("caslie_serve_batch_size", n, model=label),
            on_fallbacks=lambda model, n: self.redone.add("caslie_batch_fallbacks_total", n, model=model),
        )
        return self.replica

    def check_health(self) -> None:
        if problem := self.replica.problem():
            raise RuntimeError(problem)

    def reconfigure(self, user_config: dict) -> None:
        """The settings a Serve config may change on a running replica (`user_config`): batching."""
        b = BatchingSettings.model_validate(user_config.get("batching", {}))
        self.live = {"batching": b.model_dump()}
        self.replica.set_batching(b.max_batch_size if b.enabled else 1, b.wait_timeout_s if b.enabled else 0.0)

    async def ping(self) -> str:
        return "ok"

    async def state(self) -> dict:
        """This replica's id and live settings (tests: a tuning change reaches running replicas)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **getattr(self, "live", {})}


def _captioner(section: dict, replica: Replica) -> CaptionPart:
    c = ServeCaptionerConfig.model_validate(section)
    return CaptionPart(build_captioner(c, batch_size=c.deployment.batching.max_batch_size), replica)


def _judges(sections: list[dict]) -> dict:
    judges = [ServeJudgeConfig.model_validate(s) for s in sections]
    return {j.name: build_judge(j, batch_size=j.deployment.batching.max_batch_size) for j in judges}


def _answerer(predictor: dict, max_adapters: int, replica: Replica) -> AnswerPart:
    from caslie_core.models.predictor import AdapterPredictor

    model = AdapterPredictor.from_spec(predictor)
    load = adapter_loader(model, predictor["adapters"], predictor.get("store"))
    return AnswerPart(model, replica, serve.multiplexed(max_num_models_per_replica=max_adapters)(load))


@serve.deployment
class Captioner(_Shell):
    """Context-conditioned captions; all images of one request in one call, batched with other requests'."""

    def __init__(self, captioner: dict) -> None:
        self.part = _captioner(captioner, self._replica())

    async def captions(self, pixels: list, prompts: list[str]) -> list[dict]:
        return await self.part.many(pixels, prompts)


@serve.deployment
class Panel(_Shell):
    """The judges in one replica (layout panel), or one judge (`Judge_<name>`, layout split: each judge sized and
    scaled on its own): one {judge: {vote, error}} per question of a request."""

    def __init__(self, judges: list[dict], label: str = "panel") -> None:
        self.part = PanelPart(_judges(judges), self._replica(), label=label)

    async def votes(self, questions: list[str]) -> list[dict]:
        return await self.part.many(questions)


@serve.deployment
class Predictor(_Shell):
    """The base model with its LoRA adapters, the adapter each request names (Serve's multiplexed model id, for
    routing; the call carries it too): answers batched, or streamed token by token."""

    def __init__(self, predictor: dict, max_adapters: int) -> None:
        self.part = _answerer(predictor, max_adapters, self._replica())

    async def answer(self, prompt: str, decoding: Decoding) -> dict:
        return await self.part.answer(prompt, decoding)

    async def stream(self, prompt: str, decoding: Decoding):
        async for event in self.part.stream(prompt, decoding):
            yield event


class Models(_Shell):
    """Captioner, panel and predictor in one replica, taking turns (`gather.Turns`): a request's captions, votes and
    answer in one call (`enrich_and_answer`), no hop between them."""

    def __init__(self, *, predictor: dict, captioner: dict, judges: list[dict], max_adapters: int) -> None:
        replica = self._replica(shared=True)
        self.engine = LocalEngine(
            replica,
            _captioner(captioner, replica),
            PanelPart(_judges(judges), replica),
            _answerer(predictor, max_adapters, replica),
        )

    async def enrich(self, subject, slots: list) -> tuple[list, dict]:
        return await self.engine.enrich(subject, slots)

    async def enrich_and_answer(self, subject, slots: list, decoding: Decoding) -> tuple[list, dict, dict]:
        return await self.engine.enrich_and_answer(subject, slots, decoding)

    async def captions(self, pixels: list, prompts: list[str]) -> list[dict]:
        return await self.engine.captions(pixels, prompts)

    async def votes(self, questions: list[str]) -> list[dict]:
        return await self.engine.votes(questions)

    async def answer(self, prompt: str, decoding: Decoding) -> dict:
        return await self.engine.answer(prompt, decoding)

    async def stream(self, prompt: str, decoding: Decoding):
        async for event in self.engine.answerer.stream(prompt, decoding):
            yield event


ModelsDeployment = serve.deployment(name="Models")(Models)
