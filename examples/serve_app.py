"""A small model served with Ray Serve's own API, for `raybridge serve` (no download: the model is built
here, with a fixed seed, so every generation of the service answers the same).

    raybridge serve --nodes 1 --time 12:00:00 --overlap 10 --name classify -- python serve_app.py
    raybridge endpoint classify          # then: curl -H "Authorization: Bearer $(cat TOKEN)" \\
                                         #   'http://127.0.0.1:8000/classify?x=0.1,0.2,0.3,0.4'
"""

import argparse

import torch
from ray import serve
from starlette.requests import Request

FEATURES, CLASSES = 4, 3


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
class Classifier:
    def __init__(self) -> None:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES)
        ).eval()

    async def __call__(self, request: Request) -> dict:
        raw = request.query_params.get("x", "0,0,0,0")
        x = torch.tensor([[float(v) for v in raw.split(",")][:FEATURES]])
        with torch.no_grad():
            scores = torch.softmax(self.model(x), dim=1)[0].tolist()
        return {"class": max(range(CLASSES), key=scores.__getitem__), "scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=1)
    args = ap.parse_args()
    serve.run(
        Classifier.options(num_replicas=args.replicas).bind(), name="classify", route_prefix="/classify"
    )
    print("deployed: /classify", flush=True)


if __name__ == "__main__":
    main()
