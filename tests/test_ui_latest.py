"""The plan panel shows the newest plan asked for, whatever order the answers finish in."""

import threading

from lora_train.ui.latest import Newest


def test_an_older_answer_that_finishes_last_is_dropped():
    plans = Newest()
    first, second = plans.start(), plans.start()
    assert plans.keep(second)
    assert not plans.keep(first)
    assert plans.keep(plans.start())  # and the next one shows again


def test_answers_in_order_all_show():
    plans = Newest()
    assert all(plans.keep(plans.start()) for _ in range(3))


def test_a_slow_first_plan_does_not_overwrite_the_next_one():
    """The browser test's race (Forge's gradio 4): the first plan blocks while the next is asked for
    and shown; the first then finishes and must not be shown."""
    plans = Newest()
    shown, release, started = [], threading.Event(), threading.Event()

    def plan(name, wait):
        ticket = plans.start()
        started.set()
        if wait:
            release.wait(5)
        if plans.keep(ticket):
            shown.append(name)

    slow = threading.Thread(target=plan, args=("old fields", True))
    slow.start()
    started.wait(5)
    plan("new fields", False)
    release.set()
    slow.join(5)
    assert shown == ["new fields"]
