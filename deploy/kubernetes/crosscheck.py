"""Cross-checks of deploy/kubernetes/*.yaml that no schema can make: each
file is valid on its own, but the files must also agree with each other
and with the agent. Run by validate.sh (with the venv's PyYAML):

    python3 crosscheck.py DIR [AGENT_BINARY [CTL_BINARY]]

Prints one `FILE: problem` line per problem and exits 1 if there is any.
With AGENT_BINARY, the agent's flags in the manifests are checked against
its `--help`; with CTL_BINARY, the rollout Job's `ctl rollout` flags
against `ctl rollout --help`. An empty argument is no binary.
"""

import re
import subprocess
import sys
from pathlib import Path

import yaml

NAMESPACE = "nine9s"

problems = []


def problem(file, what):
    problems.append(f"{file}: {what}")


def pod_spec(doc):
    """The pod template's spec of a workload, or None."""
    if doc.get("kind") in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def grace_needed(container):
    """preStop sleep + --shutdown-grace + the agent's 1 s stop margin."""
    seconds = 1
    command = (container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")) or []
    if command[:1] == ["sleep"]:
        seconds += int(command[1])
    for arg in container.get("args", []):
        if arg.startswith("--shutdown-grace="):
            match = re.fullmatch(r"(\d+)s", arg.split("=", 1)[1])
            seconds += int(match.group(1)) if match else 3600
            break
    else:
        seconds += 10  # the agent's default
    return seconds


def check_workload(file, doc, secrets):
    kind, name = doc["kind"], doc["metadata"]["name"]
    spec = pod_spec(doc)
    labels = doc["spec"]["template"].get("metadata", {}).get("labels", {})
    selector = doc["spec"].get("selector", {}).get("matchLabels", {})
    for key, value in selector.items():
        if labels.get(key) != value:
            problem(file, f"{kind}/{name}: selector {key}={value} does not match the pod template's labels")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounted = set()
    containers = spec.get("initContainers", []) + spec["containers"]
    for c in containers:
        ports = {p["containerPort"] for p in c.get("ports", [])}
        for m in c.get("volumeMounts", []):
            mounted.add(m["name"])
            if m["name"] not in volumes:
                problem(file, f"{kind}/{name}: container {c['name']} mounts {m['name']}, which is no volume of the pod")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = c.get(probe, {}).get("grpc")
            if grpc and grpc["port"] not in ports:
                problem(file, f"{kind}/{name}: {probe} asks port {grpc['port']}, which container {c['name']} does not declare")
        if c.get("lifecycle", {}).get("preStop") or any(a.startswith("--shutdown-grace") for a in c.get("args", [])):
            period = spec.get("terminationGracePeriodSeconds", 30)
            needed = grace_needed(c)
            if period <= needed:
                problem(file, f"{kind}/{name}: terminationGracePeriodSeconds {period} leaves no room"
                        f" for preStop + --shutdown-grace + 1 s ({needed} s)")
    for v in volumes:
        if v not in mounted:
            problem(file, f"{kind}/{name}: volume {v} is mounted by no container")
    for v in volumes.values():
        secret = v.get("secret")
        if not secret:
            continue
        known = secrets.get(secret["secretName"])
        if known is None:
            problem(file, f"{kind}/{name}: Secret {secret['secretName']} is not in secrets.example.yaml")
            continue
        for item in secret.get("items", []):
            if item["key"] not in known:
                problem(file, f"{kind}/{name}: Secret {secret['secretName']} has no key {item['key']}")


def agent_container(doc):
    for c in pod_spec(doc)["containers"]:
        if c["name"] == "agent":
            return c
    return None


def agent_flags(binary):
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(--[a-z][a-z-]*)", help_text))


def main():
    directory = Path(sys.argv[1])
    binary = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    ctl = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    documents = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except yaml.YAMLError as e:
            problem(path.name, f"not YAML: {e}".replace("\n", " "))
            continue
        documents[path.name] = docs
        for d in docs:
            if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= d.keys():
                problem(path.name, "a document without apiVersion, kind and metadata")
                continue
            if d["kind"] != "Namespace" and d["metadata"].get("namespace") != NAMESPACE:
                problem(path.name, f"{d['kind']}/{d['metadata'].get('name')} is not in namespace {NAMESPACE}")

    secrets = {
        d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
        for d in documents.get("secrets.example.yaml", [])
        if isinstance(d, dict) and d.get("kind") == "Secret"
    }
    workloads = [(f, d) for f, docs in documents.items() for d in docs if isinstance(d, dict) and pod_spec(d)]
    for file, doc in workloads:
        check_workload(file, doc, secrets)

    # The DaemonSet and the Deployment run the same agent: their agent
    # containers must not drift apart.
    agents = [(f, d, agent_container(d)) for f, d in workloads if agent_container(d)]
    for (f1, d1, c1), (f2, d2, c2) in zip(agents, agents[1:]):
        if c1 != c2:
            problem(f2, f"the agent container of {d2['kind']}/{d2['metadata']['name']} differs from {f1}'s")

    # Services select the agent pods and name ports they declare.
    for file, docs in documents.items():
        for svc in (d for d in docs if isinstance(d, dict) and d.get("kind") == "Service"):
            selector = svc["spec"].get("selector", {})
            for wf, wd, c in agents:
                labels = wd["spec"]["template"]["metadata"]["labels"]
                if any(labels.get(k) != v for k, v in selector.items()):
                    problem(file, f"Service/{svc['metadata']['name']} does not select the pods of {wf}")
                names = {p.get("name") for p in c.get("ports", [])}
                for port in svc["spec"]["ports"]:
                    target = port.get("targetPort")
                    if isinstance(target, str) and target not in names:
                        problem(file, f"Service/{svc['metadata']['name']}: targetPort {target} is no port of the agent in {wf}")

    # ... and nothing else: a rollout Job must get no traffic.
    others = [(f, d) for f, d in workloads if not agent_container(d)]
    for file, docs in documents.items():
        for svc in (d for d in docs if isinstance(d, dict) and d.get("kind") == "Service"):
            selector = svc["spec"].get("selector", {})
            for wf, wd in others:
                labels = wd["spec"]["template"].get("metadata", {}).get("labels", {})
                if selector and all(labels.get(k) == v for k, v in selector.items()):
                    problem(file, f"Service/{svc['metadata']['name']} selects the pods of {wf}, which run no agent")

    # The agent's flags, against the agent itself.
    if binary:
        known = agent_flags(binary)
        for file, doc, c in agents:
            for arg in c.get("args", []):
                flag = arg.split("=", 1)[0]
                if not flag.startswith("--") or flag in known:
                    continue
                problem(file, f"the agent has no flag {flag}")

    # ctl's flags in the rollout Job's script, against ctl.
    if ctl:
        rollout_help = subprocess.run([ctl, "rollout", "--help"], capture_output=True, text=True)
        known = set(re.findall(r"(--[a-z][a-z-]*)", rollout_help.stdout))
        for file, docs in documents.items():
            for doc in docs:
                if not (isinstance(doc, dict) and doc.get("kind") == "Job"):
                    continue
                for c in pod_spec(doc)["containers"]:
                    script = "\n".join(c.get("command", []) + c.get("args", []))
                    for line in script.splitlines():
                        if "ctl rollout" not in line:
                            continue
                        if rollout_help.returncode != 0:
                            problem(file, "this ctl has no rollout command")
                        for flag in re.findall(r"(--[a-z][a-z-]*)", line.split("ctl rollout", 1)[1]):
                            if flag not in known:
                                problem(file, f"ctl rollout has no flag {flag}")

    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
