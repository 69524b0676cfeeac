"""Issue 11 part C: remote equals local, or a refusal before the job runs that names the line and why.

Each test runs the same code locally (on a fresh tiny model) and remotely (on the loopback server's copy,
through a handle built from its spec alone) and compares bit for bit; where a behaviour is new, the local
run is also checked against plain torch.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils.data import DataLoader

import tether
from tether import LanguageModel, NNsight, tiny
from tether.server.app import start_server
from tether.tensor_codec import _leaf_requiring_grad

PROMPT = "The quick brown fox"


def served() -> dict:
    """"tiny" (a 2-layer GPT-2 + tokenizer) and "net" (the walkthrough's two Linear layers)."""
    return {"tiny": tiny.tiny_gpt2(), "net": tiny.tiny_net()}


pytestmark = pytest.mark.usefixtures("client_config")


def _same(a, b) -> None:
    """Bit for bit; requires_grad too, for leaves (an activation's graph stays on the server: it arrives
    detached)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert _leaf_requiring_grad(a) == b.requires_grad and torch.equal(a.detach(), b.detach())
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    else:
        assert a == b


def _both(llm, rllm):
    return ((llm, False), (rllm, True))


@pytest.fixture
def net():
    return NNsight(tiny.tiny_net())


@pytest.fixture
def rnet():
    return NNsight("net")


@pytest.fixture
def x():
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(5))


class Box:
    """A plain object from outside the body."""

    def __init__(self):
        self.n = 1

    def twice(self):
        return self.n * 2


# ---- 14. outside lists, dicts and plain objects ------------------------------------------------------


def test_a_name_the_body_only_augments_is_sent_and_comes_back(llm, rllm):
    def run(model, **remote):
        counter = 10
        with model.trace(PROMPT, **remote):
            counter += 1  # (reads counter: the server needs its value)
            top = model.lm_head.output[0, -1].argmax().save()
        return counter, top

    counter, top = run(llm)
    r_counter, r_top = run(rllm, remote=True)
    assert counter == r_counter == 11 and torch.equal(top, r_top)


def test_outside_containers_come_back_mutated_in_a_trace(llm, rllm):
    runs = {}
    for model, remote in _both(llm, rllm):
        outs, d, box = [], {"keep": 1, "drop": 2}, Box()
        ids = (id(outs), id(d), id(box))
        with model.trace(PROMPT, remote=remote):
            outs.append(model.transformer.h[0].output[0])
            outs.extend([model.transformer.h[1].output[0][0, -1], 7])
            box.hidden = model.transformer.ln_f.output
            box.n = 5
            d["logits"] = model.lm_head.output
            del d["drop"]
        assert (id(outs), id(d), id(box)) == ids  # the caller's own objects, changed in place
        runs[remote] = (outs, d, vars(box))
    _same(runs[False], runs[True])
    hf, tok = tiny.tiny_gpt2()
    ids = tok(PROMPT, return_tensors="pt")
    expected = hf(**ids, output_hidden_states=True)
    assert torch.equal(runs[False][1]["logits"], expected.logits)
    assert torch.equal(runs[False][2]["hidden"], expected.hidden_states[-1])


def test_outside_list_fills_across_generation_steps(llm, rllm):
    runs = {}
    for model, remote in _both(llm, rllm):
        tokens = []
        with model.generate(PROMPT, max_new_tokens=3, remote=remote):
            model.all()
            tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
        runs[remote] = tokens
    assert len(runs[False]) == 3
    _same(runs[False], runs[True])


def test_outside_containers_come_back_mutated_in_a_session(llm, rllm):
    runs = {}
    for model, remote in _both(llm, rllm):
        norms, seen = [], {}
        with model.session(remote=remote):
            for prompt in (PROMPT, "Hello"):
                with model.trace(prompt):
                    norms.append(model.lm_head.output.norm())
                seen[prompt] = len(norms)
        runs[remote] = (norms, seen)
    _same(runs[False], runs[True])
    assert runs[True][1] == {PROMPT: 1, "Hello": 2}


def test_unchanged_outside_values_keep_their_identity(llm, rllm):
    config = {"scale": 2, "rows": [1, 2]}
    before = config["rows"]
    with rllm.trace(PROMPT, remote=True):
        out = (rllm.lm_head.output * config["scale"]).save()
    assert config["rows"] is before and config == {"scale": 2, "rows": [1, 2]} and out.shape[-1] == 512


def test_an_outside_list_given_what_no_client_can_load_stays_unchanged_and_says_so(rnet, x, capsys):
    outs = [1]
    with rnet.trace(x, remote=True):
        class Thing:
            pass

        outs.append(Thing())
    assert outs == [1]
    out = capsys.readouterr().out
    assert "`outs` (" in out and "stays on the server" in out


def test_a_method_of_an_outside_object_is_refused_before_the_job(rllm):
    box = Box()
    with pytest.raises(tether.TetherError, match=r"line \d+: `box.twice` belongs to the class Box"):
        with rllm.trace(PROMPT, remote=True):
            n = box.twice()  # noqa: F841


# ---- 15, 16. every keyword reaches the server; scan + validate then the real pass ----------------------


def test_invoker_args_reach_the_server(llm, rllm):
    runs = {}
    for model, remote in _both(llm, rllm):
        with model.trace(PROMPT, invoker_args={"max_length": 2, "truncation": True}, remote=remote):
            logits = model.lm_head.output.save()
        runs[remote] = logits
    _same(runs[False], runs[True])
    hf, tok = tiny.tiny_gpt2()
    plain = hf(**tok(PROMPT, max_length=2, truncation=True, return_tensors="pt")).logits
    assert runs[False].shape[1] == 2 and torch.equal(runs[False], plain)


def test_generate_keywords_reach_the_server(llm, rllm):
    runs = {}
    for model, remote in _both(llm, rllm):
        with model.generate(PROMPT, max_new_tokens=4, min_new_tokens=4, remote=remote):
            out = model.generator.output.save()
        runs[remote] = out
    _same(runs[False], runs[True])
    assert runs[True].shape[1] == len(llm.tokenizer(PROMPT)["input_ids"]) + 4


def test_scan_and_validate_then_the_real_pass(net, rnet, x):
    runs = {}
    for model, remote in ((net, False), (rnet, True)):
        with model.trace(x, scan=True, validate=True, remote=remote):
            hidden = model.layer1.output.clone().save()
            out = model.output.save()
        runs[remote] = (hidden, out)
    _same(runs[False], runs[True])
    plain = tiny.tiny_net()
    assert torch.equal(runs[True][0], plain.layer1(x)) and torch.equal(runs[True][1], plain(x))


def test_validate_reports_a_bad_index_before_the_real_pass(rnet, x):
    with pytest.raises(IndexError) as info:
        with rnet.trace(x, scan=True, validate=True, remote=True):
            rnet.layer1.output[:, 10] = 0
    assert isinstance(info.value, tether.RemoteError)


def test_a_remote_scan_of_a_saved_tensor_gives_its_shape_and_dtype(net, rnet, x):
    with net.scan(x):
        local = net.layer1.output.save()
    with rnet.scan(x, remote=True):
        remote = rnet.layer1.output.save()
    assert remote.is_meta and (remote.shape, remote.dtype) == (local.shape, local.dtype)


# ---- 17. requires_grad across the wire; gradients with respect to inputs --------------------------------


def test_gradients_with_respect_to_inputs(net, rnet):
    runs = {}
    for model, remote in ((net, False), (rnet, True)):
        x = torch.rand((2, 5), generator=torch.Generator().manual_seed(3)).requires_grad_()
        with model.trace(x, remote=remote):
            out = model.output.save()
            out.sum().backward()
            grad = x.grad.save()
            same_x = x.save()
        assert same_x.requires_grad and same_x.dtype == x.dtype and same_x.shape == x.shape
        runs[remote] = (grad, same_x)
    _same(runs[False], runs[True])
    plain, x = tiny.tiny_net(), torch.rand((2, 5), generator=torch.Generator().manual_seed(3)).requires_grad_()
    plain(x).sum().backward()
    assert torch.equal(runs[True][0], x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_tensor_that_requires_grad_keeps_it_and_its_dtype(rnet, x, dtype):
    w = torch.ones(2, 3, dtype=dtype, requires_grad=True)
    with rnet.trace(x, remote=True):
        back = w.save()
        loss = (w * 2).sum()
        loss.backward()
        g = w.grad.save()
    assert back.requires_grad and back.dtype == dtype and back.shape == (2, 3) and torch.equal(back.detach(), w)
    assert torch.equal(g, torch.full((2, 3), 2, dtype=dtype))


# ---- 18. a remote handle stays remote ----------------------------------------------------------------


def test_trace_false_remote_returns_the_output(llm, rllm, net, rnet, x):
    _same(net.trace(x, trace=False), rnet.trace(x, trace=False, remote=True))
    assert torch.equal(rnet.trace(x, trace=False, remote=True), tiny.tiny_net()(x))
    local, remote = llm.trace(PROMPT, trace=False), rllm.trace(PROMPT, trace=False, remote=True)
    assert type(local) is type(remote) and torch.equal(local.logits, remote.logits)
    with rllm.trace(PROMPT, remote=True):  # and the handle still runs traces remotely afterwards
        logits = rllm.lm_head.output.save()
    assert torch.equal(logits, local.logits)


def test_dispatch_true_keeps_a_hosted_model_remote(llm):
    handle = LanguageModel("tiny", dispatch=True)
    assert all(p.device.type == "meta" for p in handle._module.parameters())
    with handle.trace(PROMPT, remote=True):
        logits = handle.lm_head.output.save()
    with llm.trace(PROMPT):
        expected = llm.lm_head.output.save()
    _same(expected, logits)


def test_a_local_model_keeps_its_hosted_name_after_running_locally(tmp_path):
    hf, tok = tiny.tiny_gpt2()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path))
    local = model.trace(PROMPT, trace=False)  # loads the weights here
    server = start_server({str(tmp_path): (hf, tok)}, host="127.0.0.1", port=0)
    try:
        with model.trace(PROMPT, remote=True, backend=server.address):
            logits = model.lm_head.output.save()
    finally:
        server.stop(grace=0)
    assert torch.equal(logits, local.logits)


def test_nnsight_by_name_is_a_remote_handle(net, rnet, x):
    assert repr(rnet) == repr(net)
    with rnet.trace(x, remote=True):
        out = rnet.output.save()
    with net.trace(x):
        expected = net.output.save()
    _same(expected, out)


# ---- 19. persistent edits --------------------------------------------------------------------------


def test_persistent_edits_apply_to_remote_jobs(x):
    runs = {}
    for model, remote in ((NNsight(tiny.tiny_net()), False), (NNsight("net"), True)):
        k = 2.0
        with model.edit() as edited:
            model.layer1.output[:] = model.layer1.output * k
        with edited.trace(x, remote=remote):
            doubled = model.output.save()
        with model.trace(x, remote=remote):
            plain = model.output.save()
        with model.edit(inplace=True):
            model.layer1.output[:, 0] = 0
        with model.trace(x, remote=remote):
            zeroed = model.output.save()
        model.clear_edits()
        with model.trace(x, remote=remote):
            cleared = model.output.save()
        runs[remote] = (doubled, plain, zeroed, cleared)
    _same(runs[False], runs[True])
    net = tiny.tiny_net()
    assert torch.equal(runs[True][0], net.layer2(net.layer1(x) * 2))
    h = net.layer1(x)
    h[:, 0] = 0
    assert torch.equal(runs[True][2], net.layer2(h))
    assert torch.equal(runs[True][1], net(x)) and torch.equal(runs[True][3], net(x))  # the hosted model: unchanged


# ---- 20. user classes and torch.utils.data: the walkthrough's LoRA trains remotely -----------------------


class LORA(torch.nn.Module):
    """The walkthrough's LoRA as an nn.Module with __init__ and forward."""

    def __init__(self, module, dim: int, r: int) -> None:
        super().__init__()
        self.r = r
        self.module = module
        self.WA = torch.nn.Parameter(torch.randn(dim, self.r), requires_grad=True)
        self.WB = torch.nn.Parameter(torch.zeros(self.r, dim), requires_grad=True)

    def forward(self, alpha: float = 1.0):
        A_x = torch.matmul(self.module.input[0][0], self.WA)
        BA_x = torch.matmul(A_x, self.WB)
        h = BA_x + self.module.output
        self.module.output = h * alpha


class WalkthroughLORA(torch.nn.Module):
    """The walkthrough's LoRA exactly as written there: `__call__`, `super(LORA, self)`, `.save()`d parameters."""

    def __init__(self, module, dim: int, r: int) -> None:
        super(WalkthroughLORA, self).__init__()  # noqa: UP008 - as the walkthrough writes it
        self.r = r
        self.module = module
        self.WA = torch.nn.Parameter(torch.randn(dim, self.r), requires_grad=True).save()
        self.WB = torch.nn.Parameter(torch.zeros(self.r, dim), requires_grad=True).save()

    def __call__(self, alpha: float = 1.0):
        A_x = torch.matmul(self.module.input[0][0], self.WA)
        BA_x = torch.matmul(A_x, self.WB)
        h = BA_x + self.module.output
        self.module.output = h * alpha

    def parameters(self):
        return [self.WA, self.WB]


def _train_lora(model, remote: bool, lora_class: type) -> list[float]:
    answer_token = model.tokenizer.encode(" Paris")[-1]
    module = model.transformer.h[-1].mlp
    losses = []
    with model.session(remote=remote) as session:
        torch.manual_seed(0)
        dataset = [["_", answer_token]] * 100
        dataloader = DataLoader(dataset, batch_size=10)
        lora = lora_class(module, 64, 4)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=0.01)
        with session.iter(dataloader, return_context=True) as (batch, iterator):
            prompt = batch[0]
            with model.trace(prompt):
                lora()
                logits = model.lm_head.output
                loss = torch.nn.functional.cross_entropy(logits[:, -1], batch[1])
                losses.append(loss.item())
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("lora_class", [LORA, WalkthroughLORA])
def test_the_walkthrough_lora_trains_remotely(llm, rllm, lora_class):
    local, remote = _train_lora(llm, False, lora_class), _train_lora(rllm, True, lora_class)
    assert len(remote) == 10 and remote == local
    assert remote[-1] < remote[0] and all(b < a for a, b in zip(remote, remote[1:]))


def test_a_user_class_method_is_still_checked_by_the_allow_list(rllm):
    class Reader(torch.nn.Module):
        def forward(self):
            return open("/etc/hostname").read()

    with pytest.raises(tether.RemoteError, match=r"'open' is not allowed"):
        with rllm.session(remote=True):
            text = Reader()()  # noqa: F841


def test_a_data_loader_with_worker_processes_is_refused(rllm):
    with pytest.raises(tether.RemoteError, match="num_workers"):
        with rllm.session(remote=True):
            loader = DataLoader([1, 2, 3], num_workers=2)  # noqa: F841


# ---- 21. remote exceptions are their own type, with the user's frames -----------------------------------


def test_a_remote_builtin_error_is_that_type_with_the_users_frame(net, rnet, x):
    for model, remote in ((net, False), (rnet, True)):
        with pytest.raises(IndexError) as info:
            with model.trace(x, remote=remote):
                hidden = model.layer1.output
                picked = hidden[0, 99]  # noqa: F841
        assert isinstance(info.value, tether.RemoteError) is remote
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == __file__ and frames[-1].line == "picked = hidden[0, 99]  # noqa: F841"
    assert "list index" not in str(info.value) and "index 99 is out of bounds" in str(info.value)


def _failing_pick(model, x, remote):
    with model.trace(x, remote=remote):
        hidden = model.layer1.output
        picked = hidden[0, 99]  # noqa: F841


def test_a_body_error_inside_a_function_has_the_same_frames_locally_and_remotely(net, rnet, x):
    """The body's frame is named after its function both ways, and the printed remote traceback shows the
    user's line without carets under a stretch of it that means nothing."""
    seen = []
    for model, remote in ((net, False), (rnet, True)):
        with pytest.raises(IndexError) as info:
            _failing_pick(model, x, remote)
        frames = traceback.extract_tb(info.value.__traceback__)
        seen.append([(f.name, f.line) for f in frames if f.filename == __file__][-2:])
        printed = "".join(traceback.format_exception(info.value))
        after = printed.split("picked = hidden[0, 99]  # noqa: F841\n")[1]
        assert not after.lstrip(" ").startswith("^"), printed
    assert seen[0] == seen[1] == [("_failing_pick", "with model.trace(x, remote=remote):"),
                                  ("_failing_pick", "picked = hidden[0, 99]  # noqa: F841")]


def test_a_remote_key_error_is_caught_by_its_own_except(rllm):
    try:
        with rllm.trace(PROMPT, remote=True):
            table = {"a": 1}
            value = table["missing"]  # noqa: F841
    except KeyError as error:
        assert isinstance(error, LookupError) and isinstance(error, tether.RemoteError)
        assert error.remote_type == "builtins.KeyError"
    else:
        pytest.fail("no KeyError")


def test_a_remote_tether_error_is_its_own_type(rnet, x):
    with pytest.raises(tether.OutOfOrderError) as info:
        with rnet.trace(x, remote=True):
            late = rnet.layer2.output  # noqa: F841
            early = rnet.layer1.output  # noqa: F841
    assert isinstance(info.value, tether.RemoteError) and "layer1" in str(info.value)


def test_a_type_outside_the_allow_list_stays_a_plain_remote_error():
    from tether.client.remote_exceptions import remote_error_type

    assert remote_error_type("os.PathLike", tether.RemoteError) is tether.RemoteError
    assert remote_error_type("builtins.SystemExit", tether.RemoteError) is tether.RemoteError
    assert remote_error_type("mypkg.Boom", tether.RemoteError) is tether.RemoteError
    assert issubclass(remote_error_type("torch.OutOfMemoryError", tether.RemoteError), torch.OutOfMemoryError)


# ---- 22. no per-job state outlives a job --------------------------------------------------------------


def test_parameter_gradients_do_not_outlive_a_job(rllm):
    local_model, tok = tiny.tiny_gpt2()
    local = LanguageModel(local_model, tokenizer=tok)
    with local.trace(PROMPT):
        local.lm_head.output.sum().backward()
        expected = local.transformer.h[0].mlp.c_fc.weight.grad.clone().save()
    for _ in range(2):  # the second job would see twice the gradient if the first one's were kept
        with rllm.trace(PROMPT, remote=True):
            rllm.lm_head.output.sum().backward()
            grad = rllm.transformer.h[0].mlp.c_fc.weight.grad.clone().save()
        _same(expected, grad)


def test_modes_and_flags_a_job_changes_do_not_outlive_it(rllm):
    with rllm.trace(PROMPT, remote=True):
        torch.set_grad_enabled(False)
        rllm.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
        rllm.transformer.h[0].mlp.train()
        changed = rllm.lm_head.output.save()
    assert not changed.requires_grad
    with rllm.trace(PROMPT, remote=True):
        grad_on = torch.is_grad_enabled()
        flag = rllm.transformer.h[0].mlp.c_fc.weight.requires_grad
        training = rllm.transformer.h[0].mlp.training
    assert (grad_on, flag, training) == (True, True, False)
