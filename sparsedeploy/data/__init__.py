"""Text sources (named, per the contract) and the token windows cut from them."""
