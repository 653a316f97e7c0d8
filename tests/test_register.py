"""POST /auth/register: validation, normalisation and uniqueness."""

from __future__ import annotations

import pytest

from tests.helpers import Server, assert_error, random_email, random_phone, strong_password


def test_register_returns_201_ok(server: Server) -> None:
    """A valid registration answers 201 {"ok": true}."""
    response = server.client().register(random_email(), strong_password())
    assert response.status == 201, response
    assert response.json().get("ok") is True


def test_register_ignores_unknown_fields(server: Server) -> None:
    """Extra fields the front end sends are ignored."""
    response = server.client().register(
        random_email(), strong_password(), guideMode="x", presetId=3, locale="en"
    )
    assert response.status == 201, response


@pytest.mark.parametrize(
    "variant",
    [
        "{}",
        "{upper}",
        "  {}  ",
        "\t{title}\n",
    ],
    ids=["same", "upper", "spaces", "tab-title"],
)
def test_duplicate_email_is_409(server: Server, variant: str) -> None:
    """The same email, in another case or with surrounding whitespace, is taken."""
    client = server.client()
    email = random_email()
    assert client.register(email, strong_password()).status == 201
    again = variant.format(email, upper=email.upper(), title=email.title())
    assert_error(client.register(again, strong_password()), 409, "email_taken")


def test_email_is_stored_trimmed_and_lower_case(server: Server) -> None:
    """An email registered in mixed case with spaces is stored normalised."""
    client = server.client()
    email, password = random_email(), strong_password()
    assert client.register(f"  {email.upper()} ", password).status == 201
    assert client.login(email, password).status == 200
    assert client.me().json()["user"]["email"] == email


@pytest.mark.parametrize(
    "fmt",
    [
        "+{d}",
        "+{d[0]} {d[1]}{d[2]}{d[3]} {d[4]}{d[5]}{d[6]} {d[7]}{d[8]}{d[9]}{d[10]}",
        "+{d[0]}-{d[1]}{d[2]}{d[3]}-{d[4]}{d[5]}{d[6]}-{d[7]}{d[8]}{d[9]}{d[10]}",
        "+{d[0]}{d[1]}{d[2]} - {d[3]}{d[4]}{d[5]}{d[6]}{d[7]}{d[8]}{d[9]}{d[10]}",
    ],
    ids=["compact", "spaces", "hyphens", "mixed"],
)
def test_duplicate_phone_with_other_spacing_is_409(server: Server, fmt: str) -> None:
    """The same phone number written with other spaces or hyphens is taken."""
    client = server.client()
    digits, formatted = random_phone()
    assert client.register(random_email(), strong_password(), phone=formatted).status == 201
    response = client.register(random_email(), strong_password(), phone=fmt.format(d=digits))
    assert_error(response, 409, "phone_taken")


def test_two_users_without_phone_are_fine(server: Server) -> None:
    """Phone is optional, and two accounts without one do not collide."""
    client = server.client()
    assert client.register(random_email(), strong_password()).status == 201
    assert client.register(random_email(), strong_password()).status == 201


@pytest.mark.parametrize(
    "email",
    [
        "plainaddress",
        "user@",
        "@example.com",
        "user name@example.com",
        "user@@example.com",
        "",
        "   ",
    ],
)
def test_invalid_email_is_400(server: Server, email: str) -> None:
    """A missing or malformed email is rejected with invalid_email."""
    assert_error(server.client().register(email, strong_password()), 400, "invalid_email")


def test_missing_email_is_400(server: Server) -> None:
    """A body without email is rejected."""
    response = server.client().post("/auth/register", {"password": strong_password()})
    assert_error(response, 400, ("invalid_email", "invalid_input"))


@pytest.mark.parametrize(
    "password",
    [
        "Ab1-xyz",  # 7 characters
        "a1" * 64 + "b",  # 129 characters
        "password123",
        "PassWord123",
        "",
    ],
    ids=["too-short", "too-long", "common", "common-mixed-case", "empty"],
)
def test_weak_password_is_400(server: Server, password: str) -> None:
    """Passwords outside 8..128 characters or on the common-password list are weak."""
    response = server.client().register(random_email(), password)
    assert_error(response, 400, "weak_password")


@pytest.mark.parametrize(
    "password",
    ["xk7Qp2mz", "a1" * 64, "correct horse battery staple 42"],
    ids=["8-chars", "128-chars", "passphrase"],
)
def test_password_boundaries_are_accepted(server: Server, password: str) -> None:
    """Passwords of exactly 8 and 128 characters with two classes are fine."""
    client = server.client()
    email = random_email()
    assert client.register(email, password).status == 201
    assert client.login(email, password).status == 200


def test_missing_password_is_400(server: Server) -> None:
    """A body without password is rejected."""
    response = server.client().post("/auth/register", {"email": random_email()})
    assert_error(response, 400, ("weak_password", "invalid_input"))


@pytest.mark.parametrize(
    "phone",
    ["call me", "555-CALL-NOW", "+1 (555) 123 4567", "1+5551234567", "++15551234567", "+"],
)
def test_bad_phone_is_400(server: Server, phone: str) -> None:
    """A phone is digits with an optional leading + and spaces or hyphens, nothing else."""
    response = server.client().register(random_email(), strong_password(), phone=phone)
    assert_error(response, 400, "invalid_phone")


def test_display_name_is_optional_and_kept(server: Server) -> None:
    """A display_name given at registration shows in /auth/me; none is fine too."""
    client = server.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password, display_name="Zoë Tester").status == 201
    assert client.login(email, password).status == 200
    assert client.me().json()["user"]["display_name"] == "Zoë Tester"

    other = server.client()
    email, password = random_email(), strong_password()
    assert other.register(email, password).status == 201
    assert other.login(email, password).status == 200
    user = other.me().json()["user"]
    assert "display_name" in user
    assert user["display_name"] in (None, "")


WRONG_TYPES = {
    "password-int": ({"password": 123}, ("invalid_input",)),
    "password-list": ({"password": ["Pw-list-123"]}, ("invalid_input",)),
    "password-object": ({"password": {"a": 1}}, ("invalid_input",)),
    "email-int": ({"email": 123}, ("invalid_input",)),
    "email-list": ({"email": ["u@example.com"]}, ("invalid_input",)),
    "display-name-int": ({"display_name": 5}, ("invalid_input",)),
    "phone-int": ({"phone": 15551234567}, ("invalid_input",)),
    "email-null": ({"email": None}, ("invalid_input", "invalid_email")),
    "password-null": ({"password": None}, ("invalid_input", "weak_password")),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES), ids=list(WRONG_TYPES))
def test_wrong_types_are_400(server: Server, case: str) -> None:
    """A field of the wrong type is a 400 JSON error (invalid_input), never a 5xx."""
    override, codes = WRONG_TYPES[case]
    body = {"email": random_email(), "password": strong_password(), **override}
    assert_error(server.client().post("/auth/register", body), 400, codes)
