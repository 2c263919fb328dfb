"""Soups that need an evaluator or a loss: greedy, learned, LCSC, adaptive layer-group ratios."""

from pysoup.search.greedy import GreedySoupResult, greedy_soup
from pysoup.search.lcsc import LcscResult, lcsc_search
from pysoup.search.learned import LayerGroupResult, LearnedSoupResult, group_ratios, layer_group_ratios, learned_soup

__all__ = [
    "GreedySoupResult",
    "LayerGroupResult",
    "LcscResult",
    "LearnedSoupResult",
    "greedy_soup",
    "group_ratios",
    "layer_group_ratios",
    "lcsc_search",
    "learned_soup",
]
