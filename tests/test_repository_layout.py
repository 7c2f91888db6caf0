"""README "Repository layout": every file it names exists, and every name in its table of
concepts is defined in the script (and, for Utils, the section) the table says."""
import importlib
import os
import re

import pytest

from conftest import REPO

SCRIPTS = ('Train', 'Test', 'Options', 'Pipeline', 'Networks', 'Utils')


def layout_section():
    with open(os.path.join(REPO, 'README.md')) as f:
        return f.read().split('\n## Repository layout\n', 1)[1].split('\n## ', 1)[0]


def concept_rows():
    """(concept, [(script, section or None, [names])]) for each row of the table."""
    rows = []
    for line in layout_section().splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if len(cells) != 2 or cells[0] in ('concept', '---'):
            continue
        places = []
        for part in re.split(r';\s*', cells[1]):
            script = re.match(r'(\w+)', part).group(1)
            section = re.search(r'§(\d)', part)
            names = re.findall(r'`(\w+)', re.sub(r'\(its .*?\)', '', part))  # (methods)
            places.append((script, section and int(section.group(1)), names))
        rows.append((cells[0], places))
    return rows


def test_the_layout_names_the_files_that_exist():
    block = layout_section().split('```')[1]
    for entry in re.findall(r'^(\S+)', block, re.MULTILINE):
        assert os.path.exists(os.path.join(REPO, entry)), entry
    for script in SCRIPTS:
        assert f'pix2pixCC_{script}.py' in block


def utils_section_of(name):
    """The number of the Utils section (`# N. title` banner) in which `name` is defined."""
    with open(os.path.join(REPO, 'pix2pixCC_Utils.py')) as f:
        text = f.read()
    section = None
    for line in text.splitlines():
        banner = re.match(r'# (\d)\. ', line)
        if banner:
            section = int(banner.group(1))
        if re.match(rf'(def|class) {name}\b|{name} = ', line):
            return section
    return None


@pytest.mark.parametrize('concept, places', concept_rows(), ids=lambda v: str(v)[:40])
def test_every_concept_lives_where_the_layout_says(concept, places):
    assert places and any(names for _, _, names in places), concept
    for script, section, names in places:
        assert script in SCRIPTS, (concept, script)
        module = importlib.import_module(f'pix2pixCC_{script}')
        for name in names:
            assert hasattr(module, name), (concept, script, name)
            # defined there, not only imported (constants have no __module__)
            defined_in = getattr(getattr(module, name), '__module__', module.__name__)
            assert defined_in == module.__name__, (concept, script, name, defined_in)
            if section is not None:
                assert utils_section_of(name) == section, (concept, name, section)
